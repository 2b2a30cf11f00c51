"""The dashboard's static files (`GET /ui/`): index.html, app.js, app.css and the bundled
chart library (vendor/: uPlot, MIT, with its LICENSE). Served by service.api.routes_ui;
no build step, nothing fetched from elsewhere at run time."""
