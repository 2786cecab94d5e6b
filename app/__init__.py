"""UI glue for the LoRITa Explorer app: importable and testable without a browser.

Importing the package runs the server's one-time set-up (:func:`app.boot.start`): torch
threads, the heavy imports, and leaving Streamlit's legacy folder mode.
"""

from app import boot as _boot

_boot.start()
