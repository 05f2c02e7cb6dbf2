"""Who am I, and can I reach the others: rank discovery, rendezvous, collectives, launcher environment."""

from ptft_dist.dist.discover import *  # noqa: F403 - transitional: split into discover/rendezvous/collectives/launcher_env
