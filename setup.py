from setuptools import find_packages, setup

setup(
    name="car-twisted",
    version="0.1.0",
    description="The CAR daemon's agent-run-tracing service, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["car_twisted", "car_twisted.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/car_plugin.py"]},
    install_requires=[
        "twisted>=24.7",
        "autobahn>=24.4",
        "orjson>=3.9",
        "txaio>=23.1",
        "zope.interface>=6.0",
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp-proto-http>=1.27",
    ],
    entry_points={"console_scripts": ["car-twisted = car_twisted.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100", "opentelemetry-proto>=1.27"],
    },
)
