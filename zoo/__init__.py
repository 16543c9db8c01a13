"""The model zoo manifests (TOML), shipped inside the wheel as the package ``kdcli.zoo.manifests``."""
