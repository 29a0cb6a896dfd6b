"""The Ray Serve application: online and batch white-blood-cell classification over HTTP.

``serve run serve/config.yaml`` starts it locally; ``serve.app:build_app`` is the builder.
"""
