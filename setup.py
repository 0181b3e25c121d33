import re

from setuptools import find_packages, setup


def version() -> str:
    """The version, kept once: in car_twisted/__init__.py."""
    with open("car_twisted/__init__.py", encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


setup(
    name="car-twisted",
    version=version(),
    description="The CAR daemon's agent-run-tracing service, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["car_twisted", "car_twisted.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/car_plugin.py"], "car_twisted.web": ["static/*"]},
    install_requires=[
        "twisted>=24.7",
        "autobahn>=24.4",
        "orjson>=3.9",
        "prometheus_client>=0.20",
        "psycopg[binary]>=3.1",
        "txaio>=23.1",
        "zope.interface>=6.0",
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp-proto-http>=1.27",
    ],
    entry_points={"console_scripts": ["car-twisted = car_twisted.cli:main"]},
    extras_require={
        # The browser tests drive Debian's chromium: set PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1.
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "playwright>=1.40",
            "opentelemetry-proto>=1.27",
        ],
    },
)
