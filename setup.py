"""The one C extension, envfs._gcm (AES-GCM of a request's blocks through OpenSSL); the rest is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("envfs._gcm", ["envfs/_gcm.c"], libraries=["crypto"], extra_compile_args=["-O2"])])
