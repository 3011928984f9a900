"""The patches: one module per framework family, each defining PATCH (see shims.patch)."""
