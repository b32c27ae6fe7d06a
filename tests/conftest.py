"""Shared pytest wiring: each area's fixtures live in their own module, registered here."""

pytest_plugins: list[str] = [
    "tests.k8s_fixtures",
    "tests.hub_fixtures",
    "tests.oci_fixtures",
    "tests.registry_fixtures",
    "tests.agent_fleet",
]
