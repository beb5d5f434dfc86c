"""Scoring behind one interface (onnx, torch), the served model's lifecycle and the scheduler."""
