"""A plugin whose import fails, as one with a missing dependency would."""

import a_package_nobody_installed  # noqa: F401
