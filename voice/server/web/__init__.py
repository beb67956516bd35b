"""The built-in browser call page: static files served by voice.server.app at
``/`` and ``/demo/…`` (plain HTML, CSS and JavaScript; no build step)."""
