"""Generated from protos/ by scripts/compile_protos.sh; do not edit."""
