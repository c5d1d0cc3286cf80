"""Reading the command line, environment, xenstore and qubesdb into frozen records."""
