"""Continuous-token AR image generation and its speculative decoding (CSpD; DESIGN 5)."""
