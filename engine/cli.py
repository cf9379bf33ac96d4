"""The `hybridmig` command line."""
import click


@click.group()
@click.version_option(package_name="hybridmig")
def main():
    """Live-migrate Linux processes with CRIU, pre-copy and a native userfaultfd handler."""
