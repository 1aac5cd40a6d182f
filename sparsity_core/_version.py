from __future__ import annotations

from typing import Final

__version__: Final = "0.1.0"

#: The plugin API this core provides. A plugin module may declare ``SPARSITY_CORE_API = 1``;
#: a plugin that targets another major API is refused (for that plugin only).
API_VERSION: Final = 1
