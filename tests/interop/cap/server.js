// CAP's own server (cds.server), listening on the loopback interface only: it serves tests.
const cds = require("@sap/cds");

cds.on("bootstrap", (app) => {
  const listen = app.listen.bind(app);
  app.listen = (port) => listen(port, "127.0.0.1");
});

module.exports = cds.server;
