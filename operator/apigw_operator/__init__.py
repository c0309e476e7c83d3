"""apigw-operator: GatewayRoute and RateLimitPolicy CRs to the gateway's validated `routes.yaml`."""
