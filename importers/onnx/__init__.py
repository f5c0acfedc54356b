"""ONNX in and out: loading, the hypergraph importer, the base writer, runtime, ONNX -> torch."""
