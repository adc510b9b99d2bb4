# The garage Pi: metrics for the shed, on a flaky Wi-Fi link. It polls on a timer rather than
# holding a connection open, and a run missed while it was off happens when it comes back.
{
  services.prometheus.exporters.node = {
    enable = true;
    port = 9100;
    openFirewall = true;
  };

  services.roost.agent = {
    mode = "timer";
    dates = "*:0/30";
  };
}
