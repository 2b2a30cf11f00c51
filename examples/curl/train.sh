#!/usr/bin/env bash
# Train y = 2x - 1 with optserve from bash: curl talks to the server, awk computes the
# gradients, jq reads and writes the JSON.
#
#   OPTSERVE_URL      the server (default http://127.0.0.1:8000)
#   OPTSERVE_API_KEY  sent as "Authorization: Bearer <key>" when set
#
# Prints "session <id>", then one line per step, then the final params as JSON on the
# last line. Exits non-zero on any HTTP error, showing the server's problem+json.
set -euo pipefail
export LC_ALL=C # awk reads and prints numbers with a '.' decimal point

URL=${OPTSERVE_URL:-http://127.0.0.1:8000}
URL=${URL%/}
STEPS=40
XS="-1 0 1 2 3" # the data: y = 2x - 1 at these points
YS=$(awk -v xs="$XS" 'BEGIN { n = split(xs, x, " "); for (i = 1; i <= n; i++) printf "%s%.17g", (i > 1 ? " " : ""), 2 * x[i] - 1 }')

for tool in curl jq awk; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "train.sh: $tool is not installed (Debian: apt-get install -y $tool)" >&2
        exit 127
    }
done

AUTH=()
if [ -n "${OPTSERVE_API_KEY:-}" ]; then
    AUTH=(-H "Authorization: Bearer $OPTSERVE_API_KEY")
fi

# api METHOD PATH [JSON_BODY [more curl arguments]]: the response body on stdout; on an
# HTTP error, the problem+json on stderr and exit 1.
api() {
    local method=$1 path=$2 body=${3-} out
    local args=(--silent --show-error --fail-with-body -X "$method" -H 'Accept: application/json')
    args+=("${AUTH[@]}")
    if [ -n "$body" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    args+=("${@:4}")
    if ! out=$(curl "${args[@]}" "$URL$path"); then
        echo "train.sh: $method $path failed" >&2
        if [ -n "$out" ]; then
            jq . <<<"$out" >&2 2>/dev/null || printf '%s\n' "$out" >&2
            jq -r 'select(.detail) | "train.sh: \(.status) \(.title): \(.detail)"' <<<"$out" >&2 2>/dev/null || true
        fi
        exit 1
    fi
    printf '%s' "$out"
}

# loss_and_grads W B: "loss dL/dw dL/db" of the mean squared error of w*x + b on the data
loss_and_grads() {
    awk -v w="$1" -v b="$2" -v xs="$XS" -v ys="$YS" 'BEGIN {
        w += 0; b += 0
        n = split(xs, x, " "); split(ys, y, " ")
        l = 0; gw = 0; gb = 0
        for (i = 1; i <= n; i++) {
            r = w * x[i] + b - y[i]
            l += r * r; gw += r * x[i]; gb += r
        }
        printf "%.17g %.17g %.17g\n", l / n, 2 * gw / n, 2 * gb / n
    }'
}

session=$(jq -nc '{
    optimizer: {name: "sgd", lr: 0.1, momentum: 0.5},
    params: {w: 0.0, b: 0.0},
    dtype: "float64"
}')
created=$(api POST /v1/sessions "$session")
SID=$(jq -r .id <<<"$created")
echo "session $SID"

w=0
b=0
for ((t = 1; t <= STEPS; t++)); do
    read -r loss gw gb <<<"$(loss_and_grads "$w" "$b")"
    body=$(jq -nc --argjson gw "$gw" --argjson gb "$gb" --argjson loss "$loss" \
        '{grads: {w: $gw, b: $gb}, loss: $loss}')
    # a retry of this request with the same key would not be applied twice
    resp=$(api POST "/v1/sessions/$SID/step" "$body" -H "Idempotency-Key: train-sh-$SID-$t")
    read -r lr w b <<<"$(jq -r '"\(.lr) \(.params.w) \(.params.b)"' <<<"$resp")"
    printf 'step %d lr %s loss %s\n' "$t" "$lr" "$loss"
done

api GET "/v1/sessions/$SID/params" | jq -c .params
