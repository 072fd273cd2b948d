"""A sample app for the demo: signs users in through policyd and reads the hub for them."""
