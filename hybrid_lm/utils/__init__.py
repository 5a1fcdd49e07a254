"""Small shared helpers with no model or training dependencies."""
