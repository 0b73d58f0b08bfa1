"""Static checks of deploy/: Dockerfile, docker-compose, Prometheus rules, Terraform."""
