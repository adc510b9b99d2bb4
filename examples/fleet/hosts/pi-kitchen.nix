# The kitchen Pi: an MQTT broker for the sensors around the house.
{
  services.mosquitto = {
    enable = true;
    listeners = [
      {
        address = "0.0.0.0";
        port = 1883;
        acl = [ "topic readwrite sensors/#" ];
        settings.allow_anonymous = true;
      }
    ];
  };
  networking.firewall.allowedTCPPorts = [ 1883 ];
}
