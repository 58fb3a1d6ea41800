"""The web dashboard: plain HTML, CSS and ES-module JavaScript in ``static/``.

No build step and no CDN: the coordinator serves these files itself (see
``herder.coordinator.dashboard_routes``), together with the ``plotly.min.js``
of the installed plotly package. The page is a thin face over the REST API
and the ``/v1/live`` WebSocket; every data call carries the bearer token the
user signs in with, so the files themselves hold no data and need no auth.
"""
