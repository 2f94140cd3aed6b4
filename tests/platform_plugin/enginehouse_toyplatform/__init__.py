"""A toy platform plugin for enginehouse: a device, a model family and a logits processor."""
