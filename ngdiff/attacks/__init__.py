"""Attacks that try to bring forgotten knowledge back: relearning, weight quantization, format shift."""
