"""Photos in: find them under the roots, recognise each by content, decode it into pixels."""
