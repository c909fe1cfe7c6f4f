"""The recipe: TOML -> typed, validated sections (pydantic), overrides, and errors mapped back to TOML lines."""
