from __future__ import annotations

from typing import Final

__version__: Final = "0.1.0"

#: The plugin API this core provides. A plugin module may declare ``SPARSITY_CORE_API = 2`` (or
#: 1: every v1 plugin keeps working unchanged); a plugin that targets another API is refused (for
#: that plugin only).
API_VERSION: Final = 2

#: The plugin APIs this core still runs: v2 only added to v1 (capabilities, context, new hooks).
SUPPORTED_APIS: Final = (1, 2)
