"""One module per detector of the observe-only mode; each defines DETECTOR, a shims.detect.core.Detector subclass.
The list and its order live in shims/detect/__init__.py (DETECTOR_MODULES)."""
