"""Development tools: mock upstreams that speak the real protocols, for `make run`, the tests and
integrators. Apart from the daemon's code: they share no helpers with the kktd package (a mock must catch
what kktd gets wrong, not share its mistakes)."""
