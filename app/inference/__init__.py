"""Layer 5: using a model: batched generation, predict, chat, merge, ONNX export."""
