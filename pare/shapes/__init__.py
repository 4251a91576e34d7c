"""The embedded default: a procedural video domain of moving coloured shapes, its text encoder, its teacher
(`builtin:shapes-t2v`, a tiny `WanTransformer3DModel` in pixel space) and an evaluator that knows the ground
truth of every video it scores."""
