"""WSGI entry point: `gunicorn app:app` and `flask --app app ...`."""
from console import create_app

app = create_app()
