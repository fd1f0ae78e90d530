"""Integrations of attnmerge into serving engines, one module per engine.

Nothing here is imported by ``import attnmerge``: each integration loads on its explicit
import, e.g. ``import attnmerge.integrations.vllm`` (docs/integration.md).
"""
