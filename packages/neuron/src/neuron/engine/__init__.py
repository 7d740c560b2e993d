"""The inference engine: a continuous-batching scheduler per loaded model."""
