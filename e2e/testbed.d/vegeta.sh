# Sourced by e2e/testbed: vegeta, the HTTP load generator the ingest load
# tests and benchmark S13 drive the ingest endpoint with (a tool the project
# did not write), built from the Go module proxy and cached by version.

VEGETA_VERSION="${KEYSTONE_VEGETA_VERSION:-v12.13.0}"

vegeta_bin() { echo "$CACHE/vegeta-$VEGETA_VERSION/bin/vegeta"; }

ensure_vegeta() {
  go_install_cached vegeta "$VEGETA_VERSION" "github.com/tsenart/vegeta/v12@$VEGETA_VERSION"
}

vegeta_write_env() {
  echo "export KEYSTONE_VEGETA_VERSION='$VEGETA_VERSION'"
  echo "export KEYSTONE_TESTBED_VEGETA='$(vegeta_bin)'"
}
