"""Thin Typer commands; the work lives in the library modules they call."""
