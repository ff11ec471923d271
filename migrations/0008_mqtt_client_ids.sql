-- MQTT client ids a user may connect with (issue 11). nats-server keeps an MQTT session per
-- account and client id, and a new connection with a session's client id takes the session
-- (and closes the old connection) whoever logs in: without a binding, any MQTT user of an
-- account can take over another device's session. Empty: any client id (the default, as
-- before). Checked by the service at MQTT logins (`mqtt_client_id_not_allowed`); other doors
-- ignore it. Changing it closes the user's connections, like any change to the user.
ALTER TABLE nats.users
  ADD COLUMN mqtt_client_ids text[] NOT NULL DEFAULT '{}'
    CONSTRAINT user_mqtt_client_ids_bounds CHECK (
      cardinality(mqtt_client_ids) <= 100
      AND array_position(mqtt_client_ids, NULL) IS NULL
      AND array_position(mqtt_client_ids, '') IS NULL
      AND length(array_to_string(mqtt_client_ids, '')) <= 25600
    );
