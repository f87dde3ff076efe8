"""Packaging shim: Dataflow's --setup_file installs the project's packages on every worker."""
import setuptools

setuptools.setup()
