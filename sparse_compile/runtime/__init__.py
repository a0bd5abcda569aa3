"""Run-time side of the backend: sessions (one per compiled model), site records, custom ops."""
