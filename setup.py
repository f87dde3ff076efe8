"""Packaging shim; the metadata, requirements and extras live in setup.cfg.

Dataflow: ``--setup_file=./setup.py`` (what ``beam_jobs.options`` passes when no other way of shipping the code is
given) makes Beam's stager build this project's sdist (``python -m build --sdist``, else ``setup.py sdist``) and
stage it as ``workflow.tar.gz``; each worker then runs ``pip install workflow.tar.gz``, which installs the packages
and ``install_requires`` but no extra. The ``preprocess`` job needs nothing else on Dataflow's default SDK image
(it ships apache-beam[gcp]); the ``tagging`` job needs torch: use the custom container (Dockerfile,
``--sdk_container_image``) instead. See README, "Dataflow".
"""
import setuptools

setuptools.setup()
