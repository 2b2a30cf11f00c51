"""The wire format optserve's server and clients share: the safetensors codec
(`wire.tensorfile`), with NumPy and the standard library only.

The boundary: `wire` imports nothing from `service` or `clients`; both import it. The
server stores optimizer state and reads binary bodies with it (`service.core.tensorfile`
wraps it so its errors are core errors), the clients encode and decode binary bodies
and state files with it (`clients.tensorfile` re-exports it). A change here is a change
of the wire format both sides speak.
"""
