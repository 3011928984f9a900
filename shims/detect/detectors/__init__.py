"""One module per detector of the observe-only mode; each defines DETECTOR, a shims.detect.detector.Detector subclass.
A module here is a detector: shims.detect.detector_modules() finds it (no list to edit)."""
