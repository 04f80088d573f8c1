"""The version of qwen-merge, recorded in every manifest and shown by `qwen-merge --version`."""

VERSION = "0.1.0"
