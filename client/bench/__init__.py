"""The scaling study behind `rmidl bench`: run configurations, predict clusters, write tables and plots."""
