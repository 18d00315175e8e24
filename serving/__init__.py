"""What every service shares: server bootstrap (health, reflection, tracing, drain), settings, logs."""
