"""Built-in recovery stages, one module each, registered like a plugin's (``surgery_stages`` hook)."""
