"""iapctl: the tiny, standard-library-only client of the iapd credential agent."""

__version__ = "0.1.0"
