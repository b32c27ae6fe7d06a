"""The Helm chart's tests (charts/modelherd): helm-unittest suites, lint and schema validation, real installs."""
