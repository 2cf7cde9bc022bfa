// A SuccessFactors-like OData service: /odata/v2/sf/User, as the V2 adapter serves it.
// No database: srv/service.js answers the reads from memory (see there why).
@path: 'sf'
service SFService {
  @cds.persistence.skip
  entity User {
    key userId    : String(20);
        firstName : String(40);
        lastName  : String(40);
        email     : String(100);
  }
}
