"""A plugin whose import fails, as a third-party plugin with a bug would."""

raise ImportError("this plugin is broken on purpose")
